"""runtime: auto | eager | onnxruntime in the server: ONNX Runtime serves a model only where its export
answers as eager does (real photos through the pretrained default model), the export cache is used on
the next start, a module the exporter can't handle falls back with its reason (or stops start-up when
onnxruntime was asked for), an .onnx file is served as it is, and forked gunicorn workers serve it."""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import requests
import torch
from PIL import Image

from conftest import expected_probs, image_bytes, tiny_model_config, tiny_net, write_config
from serve.app import create_app
from serve.cli import main
from serve.config import build_config, load_config
from serve.cores import available_cores
from serve.errors import CheckpointError, ConfigError
from servers import ROOT, Server
from test_onnx_runtime import Branchy, MatrixExp

DEFAULT_CONFIG = ROOT / "models" / "models.yaml"


def photos() -> dict[str, bytes]:
    from skimage import data

    out = {}
    for name in ("chelsea", "astronaut", "coffee", "rocket"):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buf, "JPEG", quality=92)
        out[name] = buf.getvalue()
    return out


@pytest.mark.slow
def test_default_model_on_onnx_runtime_answers_as_eager_on_real_photos(tmp_path):
    """The pretrained EfficientNet-Lite0, auto (ONNX Runtime) against eager: top-5 identical, probabilities within 1e-4."""
    answers = {}
    for runtime in ("auto", "eager"):
        data = load_config(DEFAULT_CONFIG, env={}).model_dump()
        models = [{**m, "runtime": runtime, "device": "cpu", "checkpoint": str(m["checkpoint"])} for m in data["models"]]
        app = create_app(build_config({"models": models, "server": {"onnx_cache_dir": str(tmp_path)}}))
        try:
            meta = app.test_client().get("/models/efficientnet_lite0").json["runtime"]
            assert meta["name"] == ("onnxruntime" if runtime == "auto" else "eager"), meta
            client = app.test_client()
            answers[runtime] = {name: client.post("/predictions/efficientnet_lite0?topk=5", data=photo,
                                                  content_type="image/jpeg").json["predictions"]
                                for name, photo in photos().items()}
        finally:
            app.extensions["serve"].close()
    for name in answers["eager"]:
        onnx_top, eager_top = answers["auto"][name], answers["eager"][name]
        assert [p["index"] for p in onnx_top] == [p["index"] for p in eager_top], name
        assert np.allclose([p["probability"] for p in onnx_top], [p["probability"] for p in eager_top], atol=1e-4), name
    assert answers["eager"]["chelsea"][0]["label"] in ("tiger cat", "Egyptian cat", "tabby")


def tiny_auto(tmp_path, **overrides) -> dict:
    checkpoint = tmp_path / "tiny.pth"
    if not checkpoint.exists():
        torch.save(tiny_net().state_dict(), checkpoint)
    return {**tiny_model_config(checkpoint, runtime="auto"), **overrides}


def test_auto_serves_onnx_runtime_and_the_next_start_reads_the_cache(tmp_path):
    cache = tmp_path / "cache"
    seen = []
    for _ in range(2):
        app = create_app(build_config({"models": [tiny_auto(tmp_path)], "server": {"onnx_cache_dir": str(cache)}}))
        try:
            client = app.test_client()
            seen.append(client.get("/models/tiny").json["runtime"])
            answer = client.post("/predictions/tiny", data=image_bytes((0, 128, 255)), content_type="image/png").json
            probs = {p["label"]: p["probability"] for p in answer["predictions"]}
            expected = expected_probs((0, 128, 255))
            assert np.allclose([probs["red"], probs["green"], probs["blue"]], expected.numpy(), atol=1e-6)
        finally:
            app.extensions["serve"].close()
    first, second = seen
    assert first["name"] == second["name"] == "onnxruntime" and first["requested"] == "auto"
    assert first["cache"] == "miss" and first["export_s"] > 0
    assert second["cache"] == "hit" and second["export_s"] is None  # no second export
    assert len(list(cache.glob("*.onnx"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("module, reason", [
    (MatrixExp, "linalg_matrix_exp"),
    (Branchy, "ONNX output differs from eager (probabilities rule)"),
])
def test_an_unexportable_module_falls_back_to_eager_with_its_reason(tmp_path, module, reason, capsys):
    torch.save({"unused": torch.zeros(1)}, tmp_path / "m.pth")  # the module has no weights: strict false skips it
    spec = tiny_auto(tmp_path, architecture=f"test_onnx_runtime:{module.__name__}", kwargs={}, labels=None,
                     checkpoint=str(tmp_path / "m.pth"), strict=False)
    app = create_app(build_config({"models": [spec], "server": {"onnx_cache_dir": str(tmp_path / "cache")}}))
    try:
        meta = app.test_client().get("/models/tiny").json["runtime"]
        answer = app.test_client().post("/predictions/tiny", data=image_bytes(), content_type="image/png")
    finally:
        app.extensions["serve"].close()
    assert meta["name"] == "eager" and meta["requested"] == "auto" and reason in meta["fallback_reason"], meta
    assert answer.status_code == 200
    config = write_config(tmp_path, [spec], onnx_cache_dir=str(tmp_path / "c2"))
    assert main(["check", str(config)]) == 0
    assert "runtime eager (auto fell back: " in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=r"model 'tiny': field 'runtime': onnxruntime can't serve it: "):
        create_app(build_config({"models": [{**spec, "runtime": "onnxruntime"}],
                                 "server": {"onnx_cache_dir": str(tmp_path / "cache")}})).extensions["serve"].close()


def export_tiny_onnx(folder) -> None:
    """The tiny net exported by torch.onnx.export with its weights as external data beside the model."""
    folder.mkdir()
    first = folder / "first.onnx"
    torch.onnx.export(tiny_net().eval(), (torch.zeros(1, 3, 8, 8),), first, dynamo=False, input_names=["pixels"],
                      dynamic_axes={"pixels": {0: "batch"}})
    onnx.save_model(onnx.load(first), folder / "tiny.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="tiny.weights", size_threshold=0)
    first.unlink()


def test_an_onnx_file_is_served_without_a_class(tmp_path):
    export_tiny_onnx(tmp_path / "model")
    spec = tiny_model_config(tmp_path / "model" / "tiny.onnx", architecture=None, kwargs={}, runtime="auto")
    app = create_app(build_config({"models": [spec]}))
    try:
        client = app.test_client()
        meta = client.get("/models/tiny").json
        answer = client.post("/predictions/tiny", data=image_bytes((255, 0, 0)), content_type="image/png").json
    finally:
        app.extensions["serve"].close()
    assert meta["runtime"]["name"] == "onnxruntime" and meta["runtime"]["cache"] == "file"
    assert meta["checkpoint"]["layout"] == "ONNX model" and meta["num_classes"] == 3
    probs = {p["label"]: p["probability"] for p in answer["predictions"]}
    assert np.allclose([probs["red"], probs["green"], probs["blue"]], expected_probs((255, 0, 0)).numpy(), atol=1e-6)
    with pytest.raises(ConfigError, match="tiny.onnx runs on onnxruntime only, not eager"):
        create_app(build_config({"models": [{**spec, "runtime": "eager"}]}))


@pytest.mark.server
def test_gunicorn_workers_serve_onnx_runtime_after_the_fork(tmp_path):
    """Preloaded in the master (which never starts ONNX Runtime), two forked workers each start their
    own session before their first request; both answer, and they stop cleanly."""
    config = write_config(tmp_path, [tiny_auto(tmp_path)], onnx_cache_dir=str(tmp_path / "cache"))
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2"}, tmp_path / "gunicorn.log",
                    inherit_settings=False)
    try:
        session = requests.Session()
        # Warm before the first request: the session for a lone batch (every core) and, with more
        # than one core, the single-threaded one for batches that run while the other worker's do.
        for _ in range(4):
            runtime = session.get(f"{server.url}/models/tiny", headers={"Connection": "close"}, timeout=10).json()["runtime"]
            assert runtime["sessions"] == sorted({1, available_cores()})
        for _ in range(12):
            answer = session.post(f"{server.url}/predictions/tiny", data=image_bytes((0, 0, 255)),
                                  headers={"Content-Type": "image/png", "Connection": "close"}, timeout=30)
            assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == "blue"
        assert session.get(f"{server.url}/models/tiny", timeout=10).json()["runtime"]["name"] == "onnxruntime"
    finally:
        assert server.stop() == 0
    log = (tmp_path / "gunicorn.log").read_text()
    assert "serving ONNX Runtime" in log and "Traceback" not in log


def test_inspect_an_onnx_file(tmp_path, capsys):
    export_tiny_onnx(tmp_path / "model")
    assert main(["inspect", str(tmp_path / "model" / "tiny.onnx")]) == 0
    out = capsys.readouterr().out
    assert "format:   ONNX (opset" in out and "input:    pixels [batch, 3, 8, 8]" in out
    assert "external data in ['tiny.weights']" in out
    assert main(["inspect", str(tmp_path / "model" / "tiny.onnx"), "--config"]) == 0
    assert "runtime: onnxruntime" in capsys.readouterr().out
    (tmp_path / "model" / "tiny.weights").unlink()
    assert main(["inspect", str(tmp_path / "model" / "tiny.onnx")]) == 1
    assert "external data file 'tiny.weights'" in capsys.readouterr().err
