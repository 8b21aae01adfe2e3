"""TorchScript files, torch.export programs and TorchServe archives, made here by the real tools
(torch.jit, torch.export, the torch-model-archiver CLI), served by the real app or refused with
proof that none of the file's code ran."""
from __future__ import annotations

import io
import json
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
import torch
import torchvision
from conftest import LABELS, expected_probs, image_bytes, match_detections, tiny_model_config, tiny_net, torch_threads
from PIL import Image

from models.tiny import TinyCNN
from serve.app import create_app
from serve.cli import main
from serve.config import ServeConfig, build_config
from serve.errors import CheckpointError, ConfigError
from serve.formats.opened import EXPORTED, TORCHSCRIPT, Implied
from serve.formats.packaged import apply_implied, detect
from serve.loader import load_model
from serve.preprocess import PreprocessSpec, build_normalizer, build_transform, decode_image

pytestmark = pytest.mark.slow

ARCHIVER = Path(sys.executable).parent / "torch-model-archiver"


# ---------------------------------------------------------------- making the files

def seeded_resnet18() -> torch.nn.Module:
    """resnet18 with seeded random weights and non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return net.eval()


def seeded_tiny_cnn() -> TinyCNN:
    torch.manual_seed(1)
    return TinyCNN(num_classes=4).eval()


def archive(folder: Path, name: str, serialized: Path, handler: str, model_file: Path | None = None,
            extra: tuple[Path, ...] = ()) -> Path:
    """A .mar made by the torch-model-archiver command, as a TorchServe user makes one."""
    command = [str(ARCHIVER), "--model-name", name, "--version", "1.0", "--serialized-file", str(serialized),
               "--handler", handler, "--export-path", str(folder), "-f"]
    if model_file is not None:
        command += ["--model-file", str(model_file)]
    if extra:
        command += ["--extra-files", ",".join(str(p) for p in extra)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return folder / f"{name}.mar"


def marker_code(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')"


class Exploit:
    """Unpickling it runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (marker_code(self.marker),))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Every model file the tests serve, made once: {name: path}."""
    folder = tmp_path_factory.mktemp("made")
    files = {}
    tiny = tiny_net().eval()
    files["tiny_scripted"] = folder / "tiny_scripted.pth"  # a TorchScript file with a state_dict's suffix
    torch.jit.save(torch.jit.script(tiny), files["tiny_scripted"])
    files["tiny_traced"] = folder / "tiny_traced.pt"
    torch.jit.save(torch.jit.trace(tiny, torch.rand(1, 3, 8, 8)), files["tiny_traced"])
    resnet = seeded_resnet18()
    files["resnet_scripted"] = folder / "resnet_scripted.pt"
    torch.jit.save(torch.jit.script(resnet), files["resnet_scripted"])
    files["resnet_traced"] = folder / "resnet_traced.pt"
    torch.jit.save(torch.jit.trace(resnet, torch.rand(1, 3, 224, 224)), files["resnet_traced"])
    files["resnet_static"] = folder / "resnet_static.pt2"
    torch.export.save(torch.export.export(resnet, (torch.rand(1, 3, 224, 224),)), files["resnet_static"])
    files["resnet_dynamic"] = folder / "resnet_dynamic.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(resnet, (torch.rand(2, 3, 224, 224),), dynamic_shapes=({0: batch},)),
                      files["resnet_dynamic"])
    files["tiny_auto"] = folder / "tiny_auto.pt2"  # Dim.AUTO after a batch-2 example: batches of 2 or more
    torch.export.save(torch.export.export(tiny, (torch.rand(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim.AUTO},)),
                      files["tiny_auto"])
    return files


# ---------------------------------------------------------------- serving and comparing

def served(spec_or_config, image: bytes | list[bytes], topk: int = 5, params: str | None = None):
    """The answer of the real app for one image (or a list, in one multipart request)."""
    config = spec_or_config if isinstance(spec_or_config, ServeConfig) else build_config({"models": [spec_or_config]})
    app = create_app(config)
    try:
        client = app.test_client()
        name = config.models[0].name
        query = params or f"topk={topk}"
        if isinstance(image, list):
            data = {f"image{i}": (io.BytesIO(b), f"x{i}.jpg") for i, b in enumerate(image)}
            response = client.post(f"/predictions/{name}?{query}", data=data, content_type="multipart/form-data")
        else:
            response = client.post(f"/predictions/{name}?{query}", data=image, content_type="application/octet-stream")
        assert response.status_code == 200, response.json
        return response.json, client.get(f"/models/{name}").json
    finally:
        app.extensions["serve"].close()


def in_process(module: torch.nn.Module, image: bytes, preprocess: PreprocessSpec | None = None) -> torch.Tensor:
    """The probabilities `module` gives for the image, preprocessed as the server does."""
    pre = preprocess or PreprocessSpec()
    tensor = build_transform(pre)(decode_image(image, 10**8, pre.mode, min_side=pre.resize))
    with torch.inference_mode():
        return module(build_normalizer(pre)(tensor[None]))[0].softmax(-1)


def assert_same_answer(answer: dict, probs: torch.Tensor, k: int = 5):
    top = probs.topk(k)
    assert [p["index"] for p in answer["predictions"]] == top.indices.tolist()
    for p, expected in zip(answer["predictions"], top.values.tolist()):
        assert p["probability"] == pytest.approx(expected, abs=1e-5)


def inspected(path: Path, capsys) -> dict[str, str]:
    """`python -m serve inspect`'s lines, label -> text."""
    assert main(["inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {label: text.strip() for label, _, text in (line.partition(":") for line in lines)}


def model_entry(checkpoint: Path, name: str = "m", **fields) -> dict:
    return {"name": name, "checkpoint": str(checkpoint), "device": "cpu", **fields}


def spec_of(entry: dict):
    return build_config({"models": [entry]}).models[0]


@pytest.fixture(scope="module")
def cat_variants(cat_jpeg):
    """Three different photos: the cat, the cat mirrored, a crop of the cat."""
    cat = Image.open(io.BytesIO(cat_jpeg))
    out = [cat_jpeg]
    for image in (cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT), cat.crop((50, 20, 400, 290))):
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


# ---------------------------------------------------------------- TorchScript

def test_formats_are_detected_by_content_not_suffix(tmp_path, made):
    assert detect(made["tiny_scripted"]) == TORCHSCRIPT  # .pth, yet TorchScript
    assert detect(made["tiny_traced"]) == TORCHSCRIPT
    assert detect(made["resnet_static"]) == EXPORTED
    state = tmp_path / "state.pt"
    torch.save(tiny_net().state_dict(), state)
    assert detect(state) is None  # a torch.save zip: the weights-only state_dict path
    loaded = load_model(spec_of(tiny_model_config(state)))
    assert loaded.layout == "bare state_dict" and loaded.implied is None


@pytest.mark.parametrize("kind", ["tiny_scripted", "tiny_traced"])
def test_torchscript_tiny_net_serves_its_known_answer(made, kind):
    entry = tiny_model_config(made[kind], architecture=None, kwargs={})
    answer, meta = served(entry, image_bytes((200, 100, 50)), topk=3)
    assert [p["label"] for p in answer["predictions"]] == ["red", "green", "blue"]
    assert [p["probability"] for p in answer["predictions"]] == pytest.approx(
        expected_probs((200, 100, 50)).tolist(), abs=1e-6)
    assert meta["checkpoint"]["layout"] == "TorchScript (TinyNet)"


@pytest.mark.parametrize("kind", ["resnet_scripted", "resnet_traced"])
def test_torchscript_resnet18_serves_what_its_weights_answer(made, cat_jpeg, kind):
    answer, _ = served(model_entry(made[kind]), cat_jpeg)
    assert_same_answer(answer, in_process(seeded_resnet18(), cat_jpeg))


def test_torchscript_pickle_naming_python_is_refused_by_torch_jit_load(tmp_path, made):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(made["tiny_traced"]) as source, zipfile.ZipFile(evil, "w") as out:
        for name in source.namelist():
            data = pickle.dumps(Exploit(marker), protocol=2) if name.endswith("/constants.pkl") else source.read(name)
            out.writestr(name, data)
    assert detect(evil) == TORCHSCRIPT
    with pytest.raises(CheckpointError, match=r"model 'm': TorchScript file .* could not be loaded: Unknown type name '__builtin__.exec'"):
        load_model(spec_of(model_entry(evil)))
    assert not marker.exists()


def test_an_architecture_beside_a_self_contained_file_is_a_config_error(made):
    with pytest.raises(ConfigError, match="field 'architecture': tiny_traced.pt is a TorchScript file, which carries its own model"):
        load_model(spec_of(tiny_model_config(made["tiny_traced"])))


def test_a_state_dict_without_architecture_is_a_config_error(tiny_checkpoint):
    with pytest.raises(ConfigError, match="model 'tiny': field 'architecture': required for a state_dict checkpoint"):
        load_model(spec_of(tiny_model_config(tiny_checkpoint, architecture=None)))


# ---------------------------------------------------------------- torch.export programs

@pytest.mark.parametrize("kind, layout", [("resnet_static", "batch 1"), ("resnet_dynamic", "batch 1..64")])
def test_exported_program_serves_a_batch_whatever_batch_it_was_exported_for(made, cat_variants, kind, layout):
    entry = model_entry(made[kind], trust_code=True, max_batch_size=4)
    answers, meta = served(entry, cat_variants)
    assert meta["checkpoint"]["layout"] == f"torch.export program ({layout})"
    resnet = seeded_resnet18()
    assert len(answers) == 3
    for answer, image in zip(answers, cat_variants):
        assert_same_answer(answer, in_process(resnet, image))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind, trust", [("resnet_traced", False), ("resnet_dynamic", True)])
def test_packaged_models_serve_on_a_gpu(made, cat_variants, kind, trust):
    answers, meta = served(model_entry(made[kind], device="cuda:0", trust_code=trust), cat_variants)
    assert meta["device"] == "cuda:0"
    resnet = seeded_resnet18()
    for answer, image in zip(answers, cat_variants):
        probs = in_process(resnet, image)
        for p in answer["predictions"]:  # cuDNN's sums (TF32) differ from the CPU's: neighbours may swap
            assert p["probability"] == pytest.approx(probs[p["index"]].item(), abs=1e-3)
        assert answer["predictions"][0]["probability"] == pytest.approx(probs.max().item(), abs=1e-3)


def test_exported_program_with_a_smallest_batch_of_two_serves_one_image(made):
    entry = tiny_model_config(made["tiny_auto"], architecture=None, kwargs={}, trust_code=True)
    answer, meta = served(entry, image_bytes((0, 0, 255)), topk=3)
    assert meta["checkpoint"]["layout"] == "torch.export program (batch 2..any)"
    assert answer["predictions"][0]["label"] == "blue"
    assert answer["predictions"][0]["probability"] == pytest.approx(expected_probs((0, 0, 255)).max().item(), abs=1e-6)


def evil_program(folder: Path, made: dict, marker: Path) -> Path:
    """tiny_auto.pt2 with one symbolic size rewritten as Python: torch.export.load eval()s it."""
    evil = folder / "evil.pt2"
    with zipfile.ZipFile(made["tiny_auto"]) as source, zipfile.ZipFile(evil, "w") as out:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("models/model.json"):
                program = json.loads(data)
                for value in program["graph_module"]["graph"]["tensor_values"].values():
                    for size in value["sizes"]:
                        if "as_expr" in size:
                            size["as_expr"]["expr_str"] = marker_code(marker)
                data = json.dumps(program).encode()
            out.writestr(name, data)
    return evil


def test_exported_program_runs_its_code_only_with_trust_code(tmp_path, made, capsys):
    marker = tmp_path / "ran"
    evil = evil_program(tmp_path, made, marker)
    entry = tiny_model_config(evil, architecture=None, kwargs={})
    with pytest.raises(CheckpointError) as err:
        load_model(spec_of(entry))
    assert "torch.export.load runs Python from the file" in err.value.message
    assert "set trust_code: true" in err.value.message
    assert inspected(evil, capsys)["format"] == "torch.export program"
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # consented: the file's Python runs, as the docstring says
        load_model(spec_of({**entry, "trust_code": True}))
    assert marker.read_text() == "ran"


def test_exported_in_training_mode_is_refused(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).train()
    path = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(2, 3, 8, 8),)), path)
    entry = tiny_model_config(path, architecture=None, kwargs={}, trust_code=True)
    with pytest.raises(CheckpointError, match=r"exported in training mode \(aten.batch_norm.default with "
                                              r"training=True\); call model.eval\(\) before torch.export.export"):
        load_model(spec_of(entry))


def test_exported_size_must_match_preprocess(made):
    entry = model_entry(made["resnet_static"], trust_code=True, preprocess={"resize": 128, "crop": 112})
    with pytest.raises(ConfigError, match=r"exported for inputs \[1, 3, 224, 224\], but field 'preprocess.crop' gives \[3, 112, 112\]"):
        load_model(spec_of(entry))


# ---------------------------------------------------------------- TorchServe archives

MODEL_FILE = '''
{marker}
from torch import nn
from models.tiny import TinyCNN  # imported, not defined here: TorchServe's rule leaves it out


class Classifier(TinyCNN):
    def __init__(self):
        super().__init__(num_classes=4)
'''
INDEX_TO_NAME = {"0": ["n01", "cat"], "1": "dog", "2": ["n03", "fox"], "3": "owl"}


@pytest.fixture(scope="module")
def eager_mar(tmp_path_factory):
    """(a): model file + state_dict + index_to_name.json, handler image_classifier; importing the
    model file writes a marker."""
    folder = tmp_path_factory.mktemp("eager")
    marker = folder / "model-file-ran"
    model_file = folder / "model.py"
    model_file.write_text(MODEL_FILE.format(marker=marker_code(marker)))
    weights = folder / "weights.pt"
    torch.save(seeded_tiny_cnn().state_dict(), weights)
    labels = folder / "index_to_name.json"
    labels.write_text(json.dumps(INDEX_TO_NAME))
    return archive(folder, "eager", weights, "image_classifier", model_file, (labels,)), marker


def test_archive_with_a_model_file_needs_trust_code(eager_mar):
    path, marker = eager_mar
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError) as err:
        load_model(spec_of(model_entry(path)))
    assert "its modelFile 'model.py' (Classifier)" in err.value.message
    assert "Set trust_code: true" in err.value.message and "give architecture:" in err.value.message
    assert not marker.exists()


def test_archive_with_a_model_file_serves_with_its_labels_and_preprocessing(eager_mar, cat_jpeg):
    path, marker = eager_mar
    spec = spec_of(model_entry(path, trust_code=True, topk=4))
    loaded = load_model(spec)
    assert marker.read_text() == "ran"  # consented: the model file was imported
    assert loaded.layout == "TorchServe archive (image_classifier), state_dict weights.pt for model.py:Classifier"
    assert loaded.implied.task == "classify" and loaded.skipped_keys == ()
    assert loaded.implied.labels == ("cat", "dog", "fox", "owl")
    spec = apply_implied(spec, loaded.implied)
    assert (spec.preprocess.resize, spec.preprocess.crop) == (256, 224)
    answer, _ = served(ServeConfig(models=(spec,)), cat_jpeg, topk=4)
    probs = in_process(seeded_tiny_cnn(), cat_jpeg)
    assert_same_answer(answer, probs, k=4)
    assert [p["label"] for p in answer["predictions"]] == [spec.labels[i] for i in probs.topk(4).indices]


def test_archive_weights_load_into_the_configured_architecture_without_running_its_code(eager_mar, cat_jpeg):
    path, marker = eager_mar
    marker.unlink(missing_ok=True)
    entry = model_entry(path, architecture="models.tiny:TinyCNN", kwargs={"num_classes": 4},
                        preprocess={"resize": 64, "crop": 64}, labels=["a", "b", "c", "d"])
    spec = spec_of(entry)
    loaded = load_model(spec)
    assert loaded.layout.endswith("state_dict weights.pt for models.tiny:TinyCNN")
    merged = apply_implied(spec, loaded.implied)  # the config's own values win
    assert merged.labels == ("a", "b", "c", "d") and (merged.preprocess.resize, merged.preprocess.crop) == (64, 64)
    assert merged.preprocess.mean == (0.485, 0.456, 0.406)  # unset in the config: TorchServe's
    answer, _ = served(ServeConfig(models=(merged,)), cat_jpeg, topk=4)
    assert_same_answer(answer, in_process(seeded_tiny_cnn(), cat_jpeg, merged.preprocess), k=4)
    assert not marker.exists()


def test_archive_with_a_torchscript_file_serves_it(tmp_path, made, cat_jpeg):
    path = archive(tmp_path, "traced", made["resnet_traced"], "image_classifier")  # (b)
    spec = spec_of(model_entry(path))
    loaded = load_model(spec)
    assert loaded.layout == "TorchServe archive (image_classifier), TorchScript resnet_traced.pt"
    answer, _ = served(ServeConfig(models=(apply_implied(spec, loaded.implied),)), cat_jpeg)
    assert_same_answer(answer, in_process(seeded_resnet18(), cat_jpeg))


@pytest.mark.parametrize("handler_name", ["handler.py", "image_classifier.py"])
def test_archive_with_a_custom_handler_is_refused_and_its_code_never_runs(tmp_path, made, capsys, handler_name):
    """(c): a handler file, even one named like a built-in handler, is the archive's own code."""
    marker = tmp_path / "handler-ran"
    handler = tmp_path / handler_name
    handler.write_text(marker_code(marker) + "\n")
    path = archive(tmp_path, "custom", made["tiny_traced"], str(handler))
    with pytest.raises(CheckpointError) as err:
        load_model(spec_of(model_entry(path, trust_code=True)))
    assert f"uses the custom handler '{handler_name}'" in err.value.message
    assert "unzip custom.mar tiny_traced.pt" in err.value.message
    lines = inspected(path, capsys)
    assert lines["handler"] == f"{handler_name} (custom: never imported here)"
    assert lines["task"] == "none: an archive with a custom handler is refused"
    assert not marker.exists()


@pytest.mark.parametrize("write", ["torch.save", "pickle.dump"])
def test_archive_whose_weights_are_a_malicious_pickle_is_refused(tmp_path, eager_mar, write):
    """(d): refused by the weights-only read, before the (trusted) model file is even imported."""
    pickle_marker = tmp_path / "pickle-ran"
    _, model_marker = eager_mar
    model_marker.unlink(missing_ok=True)
    weights = tmp_path / "weights.pt"
    if write == "torch.save":
        torch.save({"model": Exploit(pickle_marker)}, weights)
    else:
        weights.write_bytes(pickle.dumps(Exploit(pickle_marker)))
    model_file = tmp_path / "model.py"
    model_file.write_text(MODEL_FILE.format(marker=marker_code(model_marker)))
    path = archive(tmp_path, "evil", weights, "image_classifier", model_file)
    with pytest.raises(CheckpointError, match="holds pickled Python objects"):
        load_model(spec_of(model_entry(path, trust_code=True)))
    assert not pickle_marker.exists() and not model_marker.exists()


def test_archive_with_the_object_detector_handler_serves_detections(tmp_path, cat_jpeg):
    """(e): the archive gives the weights and the task, the config the torchvision builder."""
    kwargs = {"weights_backbone": None, "num_classes": 3}
    torch.manual_seed(2)
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, **kwargs)
    weights = tmp_path / "detector.pth"
    torch.save(detector.state_dict(), weights)
    labels = tmp_path / "index_to_name.json"
    labels.write_text(json.dumps({"object_type_names": ["__background__", "cat", "dog"]}))
    path = archive(tmp_path, "detector", weights, "object_detector", extra=(labels,))
    spec = spec_of(model_entry(path, architecture="fasterrcnn_mobilenet_v3_large_320_fpn", kwargs=kwargs))
    loaded = load_model(spec)
    assert isinstance(loaded.module, torchvision.models.detection.FasterRCNN) and not loaded.module.training
    assert torch.equal(loaded.module.roi_heads.box_predictor.cls_score.weight,
                       detector.roi_heads.box_predictor.cls_score.weight)
    merged = apply_implied(spec, loaded.implied)
    assert merged.task == "detect"
    assert merged.labels == ("__background__", "cat", "dog")
    # One thread on both sides: the same float32 sums, so the same top 100 of the many near-equal scores.
    answer, _ = served(ServeConfig(models=(merged,), server={"torch_threads": 1}), cat_jpeg, params="threshold=0")
    image = decode_image(cat_jpeg, 10**8)
    with torch.inference_mode(), torch_threads(1):
        expected = detector.eval()([torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
                                    .view(image.height, image.width, 3).permute(2, 0, 1).float() / 255])[0]
    assert len(answer["detections"]) == len(expected["scores"]) > 0
    pairs = match_detections(answer["detections"], expected["scores"], expected["boxes"], expected["labels"],
                             score_rtol=0, score_atol=1e-5, box_atol=0.01)
    assert [answer["detections"][j]["label"] for j in pairs] == [merged.labels[i] for i in expected["labels"]]


def test_archive_with_an_onnx_file_is_served_by_onnx_runtime(tmp_path):
    """An image_classifier archive whose serialized file is ONNX: ONNX Runtime serves it from memory."""
    from conftest import expected_probs, image_bytes

    onnx_file = tmp_path / "tiny.onnx"
    torch.onnx.export(tiny_net().eval(), (torch.rand(1, 3, 8, 8),), str(onnx_file), dynamo=False,
                      input_names=["pixels"], dynamic_axes={"pixels": {0: "batch"}})
    path = archive(tmp_path, "onnx", onnx_file, "image_classifier")
    entry = model_entry(path, labels=LABELS, preprocess={"resize": 8, "crop": 8, "mean": [0, 0, 0], "std": [1, 1, 1]})
    loaded = load_model(spec_of(entry))
    assert loaded.module is None and loaded.runtime.name == "onnxruntime" and "ONNX tiny.onnx" in loaded.layout
    answer, _ = served(spec_of(entry), image_bytes((0, 255, 0)), topk=3)
    probs = {p["label"]: p["probability"] for p in answer["predictions"]}
    assert [probs[label] for label in LABELS] == pytest.approx(expected_probs((0, 255, 0)).tolist(), abs=1e-6)
    with pytest.raises(ConfigError, match="runs on onnxruntime only, not eager"):
        served(spec_of({**entry, "runtime": "eager"}), image_bytes())


@pytest.mark.parametrize("mapping, message", [
    (["cat", "dog"], "index_to_name.json must map indices to names"),
    ({"0": "cat", "2": "dog"}, r"indices must run 0..1, missing \[1\]"),
    ({"zero": "cat"}, "entry 'zero': 'cat' is not"),
])
def test_archive_with_a_bad_index_to_name_says_how_to_override(tmp_path, made, mapping, message):
    labels = tmp_path / "index_to_name.json"
    labels.write_text(json.dumps(mapping))
    path = archive(tmp_path, "labels", made["tiny_traced"], "image_classifier", extra=(labels,))
    entry = model_entry(path, preprocess={"resize": 8, "crop": 8})
    with pytest.raises(CheckpointError, match=message + ".*set labels: to override it"):
        load_model(spec_of(entry))
    assert load_model(spec_of({**entry, "labels": LABELS})).implied.labels is None  # the config's labels win


def test_archive_with_a_text_handler_is_refused(tmp_path, made):
    path = archive(tmp_path, "text", made["tiny_traced"], "text_classifier")
    with pytest.raises(CheckpointError, match="handler 'text_classifier', which is not one of the image tasks"):
        load_model(spec_of(model_entry(path)))


def test_what_a_checkpoint_implies_fills_only_what_the_config_left_unset(tmp_path):
    implied = Implied("detect", ("a", "b"), {"resize": 300, "crop": 300, "std": (0.5, 0.5, 0.5)})
    silent = apply_implied(spec_of(model_entry(tmp_path / "m.mar")), implied)
    assert (silent.task, silent.labels) == ("detect", ("a", "b"))
    assert (silent.preprocess.resize, silent.preprocess.crop, silent.preprocess.std) == (300, 300, (0.5, 0.5, 0.5))
    explicit = spec_of(model_entry(tmp_path / "m.mar", task="detect", detect={"score_threshold": 0.25},
                                   labels=["x", "y"], preprocess={"resize": 400, "crop": 200}))
    merged = apply_implied(explicit, implied)
    assert merged.task_options.score_threshold == 0.25
    assert merged.labels == ("x", "y")
    assert (merged.preprocess.resize, merged.preprocess.crop, merged.preprocess.std) == (400, 200, (0.5, 0.5, 0.5))


def test_the_server_applies_what_an_archive_implies(eager_mar, cat_jpeg):
    """From a plain config: the archive's labels and TorchServe's preprocessing, no manual merge."""
    path, _ = eager_mar
    answer, meta = served(model_entry(path, trust_code=True, topk=4), cat_jpeg, topk=4)
    assert (meta["input"]["resize"], meta["input"]["crop"]) == (256, 224)
    probs = in_process(seeded_tiny_cnn(), cat_jpeg)
    assert_same_answer(answer, probs, k=4)
    names = ("cat", "dog", "fox", "owl")
    assert [p["label"] for p in answer["predictions"]] == [names[i] for i in probs.topk(4).indices]


# ---------------------------------------------------------------- inspect

def test_inspect_describes_each_format_without_running_it(made, eager_mar, capsys):
    path, marker = eager_mar
    marker.unlink(missing_ok=True)
    lines = inspected(made["tiny_scripted"], capsys)
    assert (lines["format"], lines["module"]) == ("TorchScript", "TinyNet, 2 tensors, 12 values")
    lines = inspected(made["resnet_dynamic"], capsys)
    assert re.fullmatch(r"x: \[(s\d+), 3, 224, 224\]", lines["inputs"])
    assert re.fullmatch(r"s\d+ in 1..64", lines["dynamic"])
    assert lines["payloads"] == "122 weights and constants, 0 of them pickled"
    assert lines["loading"].endswith("needs trust_code: true")
    lines = inspected(path, capsys)
    assert lines["format"] == "TorchServe archive"
    assert lines["handler"] == "image_classifier (built-in)" and lines["task"] == "classify"
    assert lines["preprocess"].startswith("resize=256, crop=224, mean=[0.485, 0.456, 0.406]")
    assert lines["model file"].startswith("model.py (classes defined: Classifier; importing it needs trust_code: true")
    assert lines["serialized"].startswith("weights.pt (") and lines["serialized"].endswith(" bytes, torch.save zip)")
    assert lines["labels"] == "4 from index_to_name.json"
    assert not marker.exists()


def test_inspect_config_prints_an_entry_for_packaged_files(tmp_path, made, capsys):
    """inspect --config for TorchScript, torch.export and archives: a working entry once the <...> are filled."""
    assert main(["inspect", str(made["tiny_traced"]), "--config"]) == 0
    entry = capsys.readouterr().out
    assert f"checkpoint: {made['tiny_traced'].resolve()}" in entry and "labels: <" in entry and "trust_code" not in entry
    assert main(["inspect", str(made["resnet_static"]), "--config"]) == 0
    assert "trust_code: true" in capsys.readouterr().out
    labels = tmp_path / "index_to_name.json"
    labels.write_text(json.dumps({"0": "red", "1": "green", "2": "blue"}))
    path = archive(tmp_path, "labelled", made["tiny_traced"], "image_classifier", extra=(labels,))
    assert main(["inspect", str(path), "--config"]) == 0
    entry = capsys.readouterr().out
    assert "task: classify" in entry and "labels:" not in entry and "trust_code" not in entry
    filled = yaml.safe_load(entry.replace("  # task", "  # ").split("\n# ")[0])
    spec = spec_of({**filled[0], "device": "cpu", "preprocess": {"resize": 8, "crop": 8}})
    assert load_model(spec).implied.labels == ("red", "green", "blue")
